from raftstate.cli.main import main

raise SystemExit(main())
