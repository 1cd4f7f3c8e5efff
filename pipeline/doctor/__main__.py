"""`python -m pipeline.doctor`: the device check where only pipeline/ and torch exist."""

from pipeline.doctor import main

raise SystemExit(main())
