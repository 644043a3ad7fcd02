"""Talks to a SPIFFE Workload API with py-spiffe, as a Python workload would, and prints JSON.

The socket comes from SPIFFE_ENDPOINT_SOCKET; the JWT audience is the only argument (or
`validate AUDIENCE TOKEN` validates one token through the Workload API and prints the
verdict). The script
fetches the default X.509-SVID and the X.509 bundles, fetches a JWT-SVID for the audience,
validates it through the Workload API (ValidateJWTSVID) and offline against the JWT bundles
the agent serves, and checks that validation for another audience fails. Every Workload API
error propagates: the script then exits non-zero with a traceback.

Run by tests/it/py_spiffe.rs, which checks the output against the server it started.
"""

import json
import sys

from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient
from spiffe.svid.jwt_svid import JwtSvid
from spiffe.workloadapi.errors import ValidateJwtSvidError

# Bound every call, so that a stuck agent fails the test instead of hanging it.
TIMEOUT_SECONDS = 20.0


def pem(certificates):
    return "".join(cert.public_bytes(Encoding.PEM).decode("ascii") for cert in certificates)


def validate(audience, token):
    """ValidateJWTSVID of TOKEN for AUDIENCE; prints {"valid": ..., ...} (a refusal is output)."""
    with WorkloadApiClient(default_timeout=TIMEOUT_SECONDS) as client:
        try:
            validated = client.validate_jwt_svid(token, audience)
            result = {"valid": True, "spiffe_id": str(validated.spiffe_id)}
        except ValidateJwtSvidError as error:
            result = {"valid": False, "error": str(error)}
    json.dump(result, sys.stdout)
    print()


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "validate":
        validate(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) != 2:
        sys.exit(
            "usage: fetch.py AUDIENCE | fetch.py validate AUDIENCE TOKEN "
            "(with SPIFFE_ENDPOINT_SOCKET set)"
        )
    audience = sys.argv[1]

    with WorkloadApiClient(default_timeout=TIMEOUT_SECONDS) as client:
        svid = client.fetch_x509_svid()
        trust_domain = svid.spiffe_id.trust_domain
        x509_bundle = client.fetch_x509_bundles().get_bundle_for_trust_domain(trust_domain)

        jwt_svid = client.fetch_jwt_svid(audience={audience})
        validated = client.validate_jwt_svid(jwt_svid.token, audience)

        jwt_bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(trust_domain)
        offline = JwtSvid.parse_and_validate(jwt_svid.token, jwt_bundle, {audience})

        try:
            client.validate_jwt_svid(jwt_svid.token, audience + "-other")
            wrong_audience_rejected = False
        except ValidateJwtSvidError:
            wrong_audience_rejected = True

    json.dump(
        {
            "x509_spiffe_id": str(svid.spiffe_id),
            "x509_chain_length": len(svid.cert_chain),
            "x509_chain_pem": pem(svid.cert_chain),
            "x509_bundle_pem": pem(x509_bundle.x509_authorities) if x509_bundle else "",
            "jwt_spiffe_id": str(jwt_svid.spiffe_id),
            "jwt_audience": sorted(jwt_svid.audience),
            "validated_spiffe_id": str(validated.spiffe_id),
            "offline_validated_spiffe_id": str(offline.spiffe_id),
            "wrong_audience_rejected": wrong_audience_rejected,
        },
        sys.stdout,
        indent=2,
    )
    print()


if __name__ == "__main__":
    main()
