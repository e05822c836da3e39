from diffalign.cli import main

raise SystemExit(main())
