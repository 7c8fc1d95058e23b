"""The UPnP IGD front end: SSDP, description, HTTP, SOAP, GENA, IGD actions, error codes."""
