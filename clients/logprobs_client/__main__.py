"""`python -m logprobs_client` is `logprobs-eval`."""

from logprobs_client.cli import main

raise SystemExit(main())
