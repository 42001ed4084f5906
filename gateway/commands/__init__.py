"""The operator commands: `explain`, `config show`, `limits` and `status`, and the client
that asks a running gateway."""
