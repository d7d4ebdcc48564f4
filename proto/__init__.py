"""The attnserve wire API (generated modules come from `make proto`)."""
