"""Bucket notifications into jobs: rules (rules.py) say which new objects get which questions;
notifications.py reads MinIO's webhook-target JSON and AWS S3 event messages into objects."""
