"""The trained model outside training: what is served, exported and registered, and its drift reference."""
