"""simfluence."""
