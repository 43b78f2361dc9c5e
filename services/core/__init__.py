"""Infrastructure shared by the Fairlane services: settings, logging, metrics, db, broker, gRPC."""
