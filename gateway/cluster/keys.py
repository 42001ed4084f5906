"""Redis key names (spec section 2) that more than one module names: the reader, the
limits and the `limits` command. Keys read in one place only are named there."""

EVENT_PATTERN = "cluster/event/*"
DESTINATION_PREFIX = "cluster/backup_repository/"
RCLONE_CONF_KEY = "private/nodes/backup_destination/rclone_conf"
# the gateway's own Limits keys
QUOTA_PREFIX = "rclone-gateway/quota/"
BWLIMIT_KEY = "rclone-gateway/bwlimit"
CONCURRENCY_KEY = "rclone-gateway/concurrency"
LIMITS_CHANGED_CHANNEL = "cluster/event/backup-limits-changed"
