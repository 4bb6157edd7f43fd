from netboot.tftp.command import main

raise SystemExit(main())
