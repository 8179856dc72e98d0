"""What the user's terminal sees: progress bars (``progress``) and the command-line argument
helpers the commands share (``arguments``). Imports nothing else from ovfast."""
