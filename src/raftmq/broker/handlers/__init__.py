"""One module per packet type: ``handle_<packet>(broker, conn, packet)`` validates and acts."""
