"""The diff stage of ``create``: compare pre and post objects by meaning and decide what an
update ships, or refuse with every reason (Contract 2)."""
