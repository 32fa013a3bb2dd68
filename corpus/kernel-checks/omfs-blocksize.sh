#!/bin/sh
# omfs: omfs_fill_super with sb_set_blocksize() failing (small_mount.py says how).
PY=${PY:-$(ls /opt/livesplice/bin/python3* | head -1)}
exec "$PY" small_mount.py omfs 'omfs: Invalid superblock'
