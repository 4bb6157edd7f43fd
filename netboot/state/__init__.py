"""State that several servers of one site share: a PostgreSQL database (`database`), when `--database` names one.

Without it every server keeps its state in local files (the lease journal, the machines file, the boot record),
as before. The lease table and its allocation rules are the DHCP server's (netboot.dhcp.lease_database); what is
here is the connection, the schema and its version, and the names of the locks taken.
"""
