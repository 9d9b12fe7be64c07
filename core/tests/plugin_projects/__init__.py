"""Small plugin projects the core tests build as wheels, and the helpers that install them."""
