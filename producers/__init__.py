"""The primary side: write capture, change log and the cycle shipper."""
