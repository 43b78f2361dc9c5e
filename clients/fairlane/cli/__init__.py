"""The `fairlane` command line."""
