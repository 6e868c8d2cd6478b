"""The browser page served at `/`: static HTML, JS and CSS (no build step, no CDN)."""
