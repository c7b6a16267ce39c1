from kto_ray.assets.tiny_model import main

raise SystemExit(main())
