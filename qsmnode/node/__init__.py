"""The service: configuration, store, receiver, tracker, jobs and sender."""
