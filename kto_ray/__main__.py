from kto_ray.cli import main

raise SystemExit(main())
