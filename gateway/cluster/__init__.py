"""The cluster as this node sees it: the state read from Redis, the reload worker that
turns it into running children, and whether the storage served here is reached."""
