"""The build stage of ``create``: build the tree unpatched and patched through a compiler
wrapper, and hand the diff stage the pairs of objects that changed (Contract 1)."""
