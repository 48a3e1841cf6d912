"""Training of the TAKDSR teacher, assistant and student models."""
