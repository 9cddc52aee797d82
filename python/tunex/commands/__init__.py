"""tunex's subcommands, one module per concern; each defines ``register(cli, convert)``."""
