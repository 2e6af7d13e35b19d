"""The demo's sample feed: varied posts, generated images and hostile events."""
