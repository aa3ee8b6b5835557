"""Example apps that ship with backroom (the demo runs `streaming`)."""
