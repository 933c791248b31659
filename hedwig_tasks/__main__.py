from hedwig_tasks.cli import main

raise SystemExit(main())
