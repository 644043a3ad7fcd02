// Command oidc-verifier is an OpenID Connect relying party built on
// github.com/coreos/go-oidc/v3, as a service that accepts JWT-SVIDs as OIDC ID tokens would
// be: given only the issuer URL, it fetches the issuer's discovery document and keys and
// verifies one token. For the Lanyard end-to-end tests (tests/tests/it/oidc.rs);
// tests/src/toolchain.rs builds it.
//
// Usage:
//
//	oidc-verifier ISSUER CA_FILE AUDIENCE TOKEN_FILE
//
// CA_FILE holds the PEM certificates that the issuer's TLS certificate must chain to (the only
// roots trusted). On success it prints one JSON object (issuer, subject, audience, expiry in
// Unix seconds, the key ID of the token's header) and exits 0; otherwise it prints the error
// on stderr and exits 1. Every network call is bounded.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
)

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: oidc-verifier ISSUER CA_FILE AUDIENCE TOKEN_FILE")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2], os.Args[3], os.Args[4]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(issuer, caFile, audience, tokenFile string) error {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("no certificate in %s", caFile)
	}
	token, err := os.ReadFile(tokenFile)
	if err != nil {
		return err
	}
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ctx = oidc.ClientContext(ctx, client)

	provider, err := oidc.NewProvider(ctx, issuer)
	if err != nil {
		return fmt.Errorf("discovery: %w", err)
	}
	verifier := provider.Verifier(&oidc.Config{ClientID: audience})
	idToken, err := verifier.Verify(ctx, strings.TrimSpace(string(token)))
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"issuer":   idToken.Issuer,
		"subject":  idToken.Subject,
		"audience": idToken.Audience,
		"expiry":   idToken.Expiry.Unix(),
	})
}
