"""Emerging-risk alerts: cluster novel-risk posts and publish alerts (the faust app)."""
