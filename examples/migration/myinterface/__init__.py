"""The example interface of MIGRATION.md: admissions, orders and results over MLLP."""
