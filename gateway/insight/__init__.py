"""Backup insight: what requests did to each repository, what the storage holds, and the
report that /status, /metrics and `rclone-gateway status` show."""
