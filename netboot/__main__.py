from netboot.cli import main

raise SystemExit(main())
