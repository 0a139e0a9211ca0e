"""Who may do what: tokens and roles, user accounts and web sessions, the route table."""
