from raftmq.cli import main

raise SystemExit(main())
