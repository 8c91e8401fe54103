from shared.conversion.cli import main
raise SystemExit(main())
