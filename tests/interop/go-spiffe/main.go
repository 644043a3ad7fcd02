// Command go-spiffe (messages say go-spiffe-client) is a workload that talks to a SPIFFE
// Workload API (the one named by SPIFFE_ENDPOINT_SOCKET) with go-spiffe v2, as a Go service
// would, and prints what it saw as JSON lines for the Lanyard end-to-end tests
// (tests/tests/it/go_spiffe.rs) to check. tests/src/toolchain.rs builds it.
//
// Subcommands:
//
//	fetch AUDIENCE
//	    workloadapi.FetchX509SVID, FetchX509Bundles, FetchJWTSVID for AUDIENCE,
//	    ValidateJWTSVID (for AUDIENCE and for another audience), and offline validation
//	    against FetchJWTBundles; one JSON object.
//	watch ROTATIONS
//	    workloadapi.WatchX509Context; one JSON line per update, and exit 0 once the default
//	    SVID's serial has changed ROTATIONS times.
//	serve HINT ALLOWED_ID
//	    an mTLS listener (spiffetls) on 127.0.0.1 presenting the SVID with HINT from an
//	    X509Source and accepting only ALLOWED_ID; prints {"listening": ADDR}, then one line
//	    per connection, and answers each client with its SPIFFE ID and certificate serial.
//	dial HINT SERVER_ID ADDR COUNT INTERVAL
//	    COUNT fresh mTLS connections to ADDR, INTERVAL apart, presenting the SVID with HINT
//	    and accepting only SERVER_ID; one JSON line per exchange.
//	validate AUDIENCE TOKEN
//	    workloadapi.ValidateJWTSVID of TOKEN for AUDIENCE; one JSON object: {"valid": true,
//	    "spiffe_id": ...} or {"valid": false, "error": ...} (a refusal is not a failure).
//	federation TRUST_DOMAIN URL PROFILE AUTH_FILE ENDPOINT_ID
//	    federation.FetchBundle from the bundle endpoint at URL, as a federated SPIRE server
//	    fetches it. PROFILE https_spiffe: AUTH_FILE is TRUST_DOMAIN's bundle (SPIFFE JSON) and
//	    the endpoint must present an X509-SVID for ENDPOINT_ID; https_web: AUTH_FILE holds the
//	    PEM roots and ENDPOINT_ID is ignored. Prints the bundle: sequence number, refresh hint
//	    in seconds, X.509 authorities as PEM, JWT key IDs; one JSON object.
//
// Every wait is bounded; any error is printed on stderr and the exit status is 1.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// callTimeout bounds each Workload API call and each TLS exchange.
const callTimeout = 20 * time.Second

// watchTimeout bounds a whole watch; serveLifetime bounds a listener left behind.
const (
	watchTimeout  = 120 * time.Second
	serveLifetime = 5 * time.Minute
)

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: go-spiffe fetch|watch|serve|dial|federation ARGS (see the doc comment)"))
	}
	var err error
	switch args := os.Args[2:]; os.Args[1] {
	case "fetch":
		err = withArgs(args, 1, func() error { return fetch(args[0]) })
	case "watch":
		err = withArgs(args, 1, func() error { return watch(args[0]) })
	case "serve":
		err = withArgs(args, 2, func() error { return serve(args[0], args[1]) })
	case "dial":
		err = withArgs(args, 5, func() error { return dial(args[0], args[1], args[2], args[3], args[4]) })
	case "validate":
		err = withArgs(args, 2, func() error { return validate(args[0], args[1]) })
	case "federation":
		err = withArgs(args, 5, func() error { return fetchFederated(args[0], args[1], args[2], args[3], args[4]) })
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func withArgs(args []string, n int, run func() error) error {
	if len(args) != n {
		return fmt.Errorf("%s takes %d arguments, got %d", os.Args[1], n, len(args))
	}
	return run()
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "go-spiffe-client:", err)
	os.Exit(1)
}

// emit prints one JSON line on stdout.
func emit(value any) {
	line, err := json.Marshal(value)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(line))
}

func validate(audience, token string) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	validated, err := workloadapi.ValidateJWTSVID(ctx, token, audience)
	if err != nil {
		emit(map[string]any{"valid": false, "error": err.Error()})
		return nil
	}
	emit(map[string]any{"valid": true, "spiffe_id": validated.ID.String()})
	return nil
}

func fetch(audience string) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()

	svid, err := workloadapi.FetchX509SVID(ctx)
	if err != nil {
		return fmt.Errorf("FetchX509SVID: %w", err)
	}
	bundles, err := workloadapi.FetchX509Bundles(ctx)
	if err != nil {
		return fmt.Errorf("FetchX509Bundles: %w", err)
	}
	bundle, err := bundles.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
	if err != nil {
		return err
	}

	jwt, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
	if err != nil {
		return fmt.Errorf("FetchJWTSVID: %w", err)
	}
	validated, err := workloadapi.ValidateJWTSVID(ctx, jwt.Marshal(), audience)
	if err != nil {
		return fmt.Errorf("ValidateJWTSVID: %w", err)
	}
	jwtBundles, err := workloadapi.FetchJWTBundles(ctx)
	if err != nil {
		return fmt.Errorf("FetchJWTBundles: %w", err)
	}
	offline, err := jwtsvid.ParseAndValidate(jwt.Marshal(), jwtBundles, []string{audience})
	if err != nil {
		return fmt.Errorf("validating the JWT-SVID offline: %w", err)
	}
	wrongAudienceError := ""
	if _, err := workloadapi.ValidateJWTSVID(ctx, jwt.Marshal(), audience+"-other"); err != nil {
		wrongAudienceError = err.Error()
	}

	emit(map[string]any{
		"x509_spiffe_id":       svid.ID.String(),
		"x509_chain_pem":       pemOf(svid.Certificates),
		"x509_bundle_pem":      pemOf(bundle.X509Authorities()),
		"jwt_spiffe_id":        jwt.ID.String(),
		"jwt_audience":         jwt.Audience,
		"jwt_token":            jwt.Marshal(),
		"validated_spiffe_id":  validated.ID.String(),
		"validated_audience":   validated.Audience,
		"offline_spiffe_id":    offline.ID.String(),
		"wrong_audience_error": wrongAudienceError,
	})
	return nil
}

// watcher prints every X.509 context and counts changes of the default SVID's serial.
type watcher struct {
	lastSerial string
	rotations  int
	wanted     int
	done       context.CancelFunc
}

func (w *watcher) OnX509ContextUpdate(update *workloadapi.X509Context) {
	received := time.Now()
	svid := update.DefaultSVID()
	leaf := svid.Certificates[0]
	bundlePEM := ""
	if bundle, err := update.Bundles.GetX509BundleForTrustDomain(svid.ID.TrustDomain()); err == nil {
		bundlePEM = pemOf(bundle.X509Authorities())
	}
	serial := leaf.SerialNumber.Text(16)
	emit(map[string]any{
		"received_unix_ms":  received.UnixMilli(),
		"spiffe_id":         svid.ID.String(),
		"serial":            serial,
		"not_after_unix_ms": leaf.NotAfter.UnixMilli(),
		"chain_pem":         pemOf(svid.Certificates),
		"bundle_pem":        bundlePEM,
	})
	if w.lastSerial != "" && serial != w.lastSerial {
		w.rotations++
	}
	w.lastSerial = serial
	if w.rotations >= w.wanted {
		w.done()
	}
}

func (w *watcher) OnX509ContextWatchError(err error) {
	fmt.Fprintln(os.Stderr, "go-spiffe-client: watch error:", err)
}

func watch(rotations string) error {
	wanted, err := strconv.Atoi(rotations)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), watchTimeout)
	defer cancel()
	finished, done := context.WithCancel(ctx)
	w := &watcher{wanted: wanted, done: done}
	// The watch ends with an error in any case: Canceled once done, the deadline, or a
	// failure of the Workload API.
	err = workloadapi.WatchX509Context(finished, w)
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("saw %d of %d rotations within %v", w.rotations, wanted, watchTimeout)
	case finished.Err() != nil:
		return nil
	default:
		return fmt.Errorf("WatchX509Context: %w", err)
	}
}

// sourceWithHint is an X509Source whose default SVID is the one with hint.
func sourceWithHint(ctx context.Context, hint string) (*workloadapi.X509Source, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	pick := func(svids []*x509svid.SVID) *x509svid.SVID {
		for _, svid := range svids {
			if svid.Hint == hint {
				return svid
			}
		}
		// No SVID has the hint: the source then has none, and handshakes fail with
		// "missing X509-SVID".
		return nil
	}
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithDefaultX509SVIDPicker(pick))
	if err != nil {
		return nil, fmt.Errorf("NewX509Source: %w", err)
	}
	return source, nil
}

// greeting is what the server answers each client.
type greeting struct {
	ClientID     string `json:"client_id"`
	ClientSerial string `json:"client_serial"`
}

func serve(hint, allowed string) error {
	allowedID, err := spiffeid.FromString(allowed)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), serveLifetime)
	defer cancel()
	source, err := sourceWithHint(ctx, hint)
	if err != nil {
		return err
	}
	defer source.Close()
	listener, err := spiffetls.ListenWithMode(ctx, "tcp", "127.0.0.1:0",
		spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(allowedID), source))
	if err != nil {
		return fmt.Errorf("spiffetls.ListenWithMode: %w", err)
	}
	go func() {
		<-ctx.Done()
		listener.Close()
	}()
	emit(map[string]any{"listening": listener.Addr().String()})
	for {
		conn, err := listener.Accept()
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		go answer(conn)
	}
}

// answer completes the handshake, reads the client's line and replies with a greeting.
func answer(conn net.Conn) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(callTimeout))
	state, err := handshake(conn)
	if err != nil {
		emit(map[string]any{"refused": err.Error()})
		return
	}
	client := state.PeerCertificates[0]
	id, err := spiffetls.PeerIDFromConnectionState(state)
	if err != nil {
		emit(map[string]any{"refused": err.Error()})
		return
	}
	reply := greeting{ClientID: id.String(), ClientSerial: client.SerialNumber.Text(16)}
	if _, err := bufio.NewReader(conn).ReadString('\n'); err != nil {
		emit(map[string]any{"refused": err.Error()})
		return
	}
	line, _ := json.Marshal(reply)
	if _, err := conn.Write(append(line, '\n')); err != nil {
		emit(map[string]any{"refused": err.Error()})
		return
	}
	emit(map[string]any{"accepted": reply.ClientID, "client_serial": reply.ClientSerial})
}

// handshake runs the TLS handshake of a spiffetls connection and returns its state.
func handshake(conn net.Conn) (tls.ConnectionState, error) {
	tlsConn, ok := conn.(interface {
		HandshakeContext(context.Context) error
		ConnectionState() tls.ConnectionState
	})
	if !ok {
		return tls.ConnectionState{}, fmt.Errorf("%T is not a TLS connection", conn)
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if err := tlsConn.HandshakeContext(ctx); err != nil {
		return tls.ConnectionState{}, err
	}
	return tlsConn.ConnectionState(), nil
}

func dial(hint, serverID, addr, count, interval string) error {
	expected, err := spiffeid.FromString(serverID)
	if err != nil {
		return err
	}
	n, err := strconv.Atoi(count)
	if err != nil {
		return err
	}
	pause, err := time.ParseDuration(interval)
	if err != nil {
		return err
	}
	ctx := context.Background()
	source, err := sourceWithHint(ctx, hint)
	if err != nil {
		return err
	}
	defer source.Close()
	for i := 1; i <= n; i++ {
		if i > 1 {
			time.Sleep(pause)
		}
		if err := exchange(ctx, source, expected, addr, i); err != nil {
			return fmt.Errorf("exchange %d of %d: %w", i, n, err)
		}
	}
	return nil
}

// exchange opens one mTLS connection, sends a line and prints the server's greeting.
func exchange(ctx context.Context, source *workloadapi.X509Source, expected spiffeid.ID, addr string, n int) error {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	conn, err := spiffetls.DialWithMode(ctx, "tcp", addr,
		spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(expected), source))
	if err != nil {
		return fmt.Errorf("spiffetls.DialWithMode: %w", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(callTimeout))
	state, err := handshake(conn)
	if err != nil {
		return err
	}
	if _, err := conn.Write([]byte("hello\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("reading the server's answer: %w", err)
	}
	var reply greeting
	if err := json.Unmarshal(line, &reply); err != nil {
		return fmt.Errorf("the server's answer %q: %w", line, err)
	}
	serverID, err := spiffetls.PeerIDFromConnectionState(state)
	if err != nil {
		return err
	}
	emit(map[string]any{
		"n":                  n,
		"server_id":          serverID.String(),
		"server_serial":      state.PeerCertificates[0].SerialNumber.Text(16),
		"seen_client_id":     reply.ClientID,
		"seen_client_serial": reply.ClientSerial,
	})
	return nil
}

func pemOf(certificates []*x509.Certificate) string {
	var out []byte
	for _, certificate := range certificates {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certificate.Raw})...)
	}
	return string(out)
}

func fetchFederated(trustDomain, url, profile, authFile, endpointID string) error {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return err
	}
	var option federation.FetchOption
	switch profile {
	case "https_spiffe":
		known, err := spiffebundle.Load(td, authFile)
		if err != nil {
			return err
		}
		id, err := spiffeid.FromString(endpointID)
		if err != nil {
			return err
		}
		option = federation.WithSPIFFEAuth(known, id)
	case "https_web":
		roots, err := os.ReadFile(authFile)
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(roots) {
			return fmt.Errorf("no certificate in %s", authFile)
		}
		option = federation.WithWebPKIRoots(pool)
	default:
		return fmt.Errorf("unknown profile %q", profile)
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	bundle, err := federation.FetchBundle(ctx, td, url, option)
	if err != nil {
		return fmt.Errorf("FetchBundle: %w", err)
	}
	sequence, _ := bundle.SequenceNumber()
	refreshHint, _ := bundle.RefreshHint()
	kids := []string{}
	for kid := range bundle.JWTAuthorities() {
		kids = append(kids, kid)
	}
	emit(map[string]any{
		"sequence":             sequence,
		"refresh_hint_seconds": int64(refreshHint / time.Second),
		"x509_authorities_pem": pemOf(bundle.X509Authorities()),
		"jwt_key_ids":          kids,
	})
	return nil
}
