"""Wire protocol of the deployer: deployer.proto and its generated modules (do not edit those)."""
