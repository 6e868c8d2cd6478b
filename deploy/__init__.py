"""Deployment targets for kvclip beyond the plain server (`kvclip serve`)."""
