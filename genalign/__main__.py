from genalign.cli import main

raise SystemExit(main())
