"""Pure decisions on a request: its canonical path, the repository address, credentials,
the login throttle, the access policy and WebDAV references. No I/O, nothing above."""
