"""rclone-gateway: an authenticating, policy-enforcing reverse proxy for backup clusters."""

__version__ = "0.1.0"
