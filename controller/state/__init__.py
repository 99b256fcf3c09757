"""What the controller keeps: the SQLite database (schema and migrations), the sealed vault, the
instantiation ledger, jobs and their locks, and what each operation may know. The only code that
speaks SQL; it imports neither the fleet nor the environments."""
