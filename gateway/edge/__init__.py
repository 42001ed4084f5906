"""The server's edge around aiohttp: admission of connections, answers to unparsable
requests, hang-ups, graceful stop, access lines and systemd notification."""
