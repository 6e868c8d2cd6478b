"""Offline half of kvclip: turns labelled images into a versioned cache artifact."""
