"""The `rclone serve` children behind the gateway."""
