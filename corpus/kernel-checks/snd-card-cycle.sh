#!/bin/sh
# ALSA card life cycle with the virtual MIDI driver: modprobe snd-virmidi creates a card
# (snd_virmidi_probe, snd_card_new); rmmod frees it (release_card_device ->
# snd_card_do_free). Runs the code of CVE-2026-80964 and CVE-2026-90198 twice and leaves
# the module loaded. Neither bug can be triggered from here: no STATE line.
set -e
for round in 1 2; do
	rmmod snd_virmidi 2>/dev/null || true
	modprobe snd-virmidi
	grep -q VirMIDI /proc/asound/cards
	rmmod snd_virmidi
	if grep -q VirMIDI /proc/asound/cards; then
		echo "the card outlived its module"
		exit 1
	fi
done
modprobe snd-virmidi
echo "virmidi card created and freed twice"
