"""The test cluster's identities, in one place: the node, its destinations, and the modules
with their passwords and the uuids of their repositories.

The end-to-end modules, the policy tables and the pure parts name the same cluster with
these. A test module that needs a cluster of its own, apart from the others' (its own
destination and repositories, passwords it searches the logs for), keeps those beside its
tests; it takes from here what it shares, as the node's user.
"""

from __future__ import annotations


def node(number: int | str) -> tuple[str, str]:
    """Node `number`'s user and password (its Redis ACL user is its gateway user)."""
    return f"node/{number}", f"node-secret-{number}"


NODE_ID = "1"
NODE = node(NODE_ID)

# The destinations: one a node hosts (a `cluster` destination), one on an rclone remote.
DEST = "0d2b7ab6-8f8b-4c43-a1d3-7f3f5f7c1a01"
REMOTE_DEST = "3f9c0e55-1b2a-4d6e-9f70-aa11bb22cc33"

# The modules: (user, password), and the uuid of the repository each owns.
TRAEFIK = ("module/traefik1", "traefik-secret")
TRAEFIK_UUID = "5c1d6c1e-2f87-4e7b-9a34-0a1d9f9e4b01"
DOKUWIKI = ("module/dokuwiki1", "doku1-secret")
DOKUWIKI_UUID = "9e2f4d10-3c55-4b0d-8f4e-5a6b7c8d9e02"
MAIL = ("module/mail1", "mail-secret")
MAIL_UUID = "a1a1a1a1-0000-4000-8000-000000000001"
LDAP = ("module/ldap1", "ldap-secret")
LDAP_UUID = "b2b2b2b2-0000-4000-8000-000000000002"

# A repository no module owns or is granted.
FOREIGN_UUID = "77777777-3c55-4b0d-8f4e-5a6b7c8d9e03"

# The password of every module, where a test module's cluster gives them all one.
MODULE_PASSWORD = "module-secret"
