// Command sds is an Envoy SDS v3 client built on Envoy's own Go API
// (github.com/envoyproxy/go-control-plane/envoy) and gRPC: it calls
// envoy.service.secret.v3.SecretDiscoveryService on a Unix socket the way Envoy does, and
// prints what it received as JSON lines for the Lanyard end-to-end tests (tests/src/sds.rs
// drives it; tests/src/toolchain.rs builds it).
//
// Subcommands:
//
//	stream -socket PATH [flags]
//	    StreamSecrets, driven by JSON lines on stdin (see below); one JSON line per response,
//	    printed as it arrives, and a last line when the stream ends.
//	fetch -socket PATH -names A,B [flags]
//	    FetchSecrets for those resource names; one response line, or the end line with the
//	    error.
//	delta -socket PATH [flags]
//	    DeltaSecrets with one request; the end line (an SDS server that does not do delta
//	    xDS answers Unimplemented).
//
// Flags shared by all three describe the node, as Envoy sends it: -node-id ID and
// -node-cluster NAME; -envoy-version X.Y.Z (default 1.30.0) for user_agent_build_version,
// or -no-build-version to send none; -metadata key=value, repeatable, for the node's
// metadata Struct ("true" and "false" become booleans, anything else a string). The
// user_agent_name is always "envoy". The connection is plaintext gRPC over unix://PATH
// with no extra headers.
//
// Stream requests, one JSON object a line on stdin:
//
//	{"names": ["spiffe://example.org/w", "ROOTCA"], "ack": true}
//	    A DiscoveryRequest with type_url type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
//	    and those resource_names (an empty list asks for everything; "names" left out repeats
//	    the previous request's), carrying version_info and response_nonce of the last
//	    response received: an ACK ("ack" may be left out: true is the default). Only the
//	    first request carries the node, as Envoy's does.
//	{"ack": false, "error": "why"}
//	    A NACK as Envoy sends it: version_info of the last ACKed response, the nonce of the
//	    last response received, and error_detail google.rpc.Status{code: 3
//	    (INVALID_ARGUMENT), message: "why"}.
//	{"wait": "5s"}
//	    Waits up to that long for a response received since the previous request or wait
//	    before reading the next line; prints {"timeout": true} if none came. It may also
//	    follow a request in the same object, to wait after sending it.
//
// On end of input the client closes its side of the stream, waits up to five seconds for
// the server to end it, and exits 0.
//
// Output, one JSON object a line on stdout:
//
//	{"version_info", "nonce", "type_url", "valid", "validation_error", "secrets": [...]}
//	    One per response. valid is the generated ValidateAll() of the DiscoveryResponse, of
//	    every Secret in it and of every SPIFFECertValidatorConfig in those (validation_error
//	    lists the failures). Each secret: {"name", "kind": "tls_certificate" |
//	    "validation_context" | …, "certificate_chain": PEM, "private_key_bytes": N (its
//	    length only, never the key), "trusted_ca": PEM, "validator": the name of
//	    custom_validator_config, "spiffe_trust_domains": {"<trust domain>": PEM}}, fields
//	    that do not apply left out.
//	{"end": true, "code": "<gRPC code name>", "message": "…"}
//	    The stream or call ended (code OK when the server closed it cleanly); the client
//	    then exits 0.
//
// A malformed request line, a bad -envoy-version or a failure to write is printed on stderr
// and the exit status is 1; a usage error exits 2. Every wait is bounded: a call by 20 s, a
// stream by 10 minutes.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

// secretTypeURL is the type of every SDS resource.
const secretTypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// spiffeValidatorName is the custom_validator_config name of Envoy's SPIFFE validator.
const spiffeValidatorName = "envoy.tls.cert_validator.spiffe"

const (
	// callTimeout bounds a FetchSecrets call and a DeltaSecrets exchange.
	callTimeout = 20 * time.Second
	// streamLifetime bounds a stream left behind by a test that never closes stdin.
	streamLifetime = 10 * time.Minute
	// endTimeout bounds the wait for the server to end the stream after end of input.
	endTimeout = 5 * time.Second
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "stream":
		err = stream(os.Args[2:])
	case "fetch":
		err = fetch(os.Args[2:])
	case "delta":
		err = delta(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fail(err)
	}
}

// fail prints err on stderr and exits 1 at once, before a deferred cancellation could end a
// stream and have its end line printed.
func fail(err error) {
	fmt.Fprintln(os.Stderr, "sds:", err)
	os.Exit(1)
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: sds stream|fetch|delta -socket PATH [flags] (see the doc comment)")
	os.Exit(2)
}

// options are the flags every subcommand takes.
type options struct {
	socket         string
	nodeID         string
	nodeCluster    string
	envoyVersion   string
	noBuildVersion bool
	metadata       metadataFlag
	names          string
}

// metadataFlag collects repeated -metadata key=value flags.
type metadataFlag []string

func (m *metadataFlag) String() string { return strings.Join(*m, ",") }

func (m *metadataFlag) Set(value string) error {
	if !strings.Contains(value, "=") {
		return fmt.Errorf("%q is not key=value", value)
	}
	*m = append(*m, value)
	return nil
}

func parseOptions(name string, args []string, withNames bool) *options {
	opts := &options{}
	flags := flag.NewFlagSet("sds "+name, flag.ContinueOnError)
	flags.StringVar(&opts.socket, "socket", "", "the SDS server's Unix socket")
	flags.StringVar(&opts.nodeID, "node-id", "lanyard-e2e", "node.id")
	flags.StringVar(&opts.nodeCluster, "node-cluster", "lanyard-e2e", "node.cluster")
	flags.StringVar(&opts.envoyVersion, "envoy-version", "1.30.0", "node.user_agent_build_version, X.Y.Z")
	flags.BoolVar(&opts.noBuildVersion, "no-build-version", false, "send no user_agent_build_version")
	flags.Var(&opts.metadata, "metadata", "node.metadata key=value (repeatable)")
	if withNames {
		flags.StringVar(&opts.names, "names", "", "resource names, comma-separated")
	}
	if err := flags.Parse(args); err != nil {
		os.Exit(2)
	}
	if opts.socket == "" || flags.NArg() != 0 {
		flags.Usage()
		os.Exit(2)
	}
	return opts
}

// node is the Node Envoy would send with these options.
func (o *options) node() (*corev3.Node, error) {
	fields := map[string]*structpb.Value{}
	for _, pair := range o.metadata {
		key, value, _ := strings.Cut(pair, "=")
		switch value {
		case "true", "false":
			fields[key] = structpb.NewBoolValue(value == "true")
		default:
			fields[key] = structpb.NewStringValue(value)
		}
	}
	node := &corev3.Node{
		Id:            o.nodeID,
		Cluster:       o.nodeCluster,
		UserAgentName: "envoy",
		Metadata:      &structpb.Struct{Fields: fields},
	}
	if !o.noBuildVersion {
		version, err := semanticVersion(o.envoyVersion)
		if err != nil {
			return nil, err
		}
		node.UserAgentVersionType = &corev3.Node_UserAgentBuildVersion{
			UserAgentBuildVersion: &corev3.BuildVersion{Version: version},
		}
	}
	return node, nil
}

func semanticVersion(text string) (*typev3.SemanticVersion, error) {
	parts := strings.Split(text, ".")
	if len(parts) != 3 {
		return nil, fmt.Errorf("-envoy-version %q is not X.Y.Z", text)
	}
	var numbers [3]uint32
	for i, part := range parts {
		n, err := strconv.ParseUint(part, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("-envoy-version %q is not X.Y.Z", text)
		}
		numbers[i] = uint32(n)
	}
	return &typev3.SemanticVersion{MajorNumber: numbers[0], MinorNumber: numbers[1], Patch: numbers[2]}, nil
}

func (o *options) client() (secretv3.SecretDiscoveryServiceClient, *grpc.ClientConn, error) {
	conn, err := grpc.NewClient("unix://"+o.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	return secretv3.NewSecretDiscoveryServiceClient(conn), conn, nil
}

// output serialises JSON lines on stdout (unbuffered: each line is written as it is printed).
var output sync.Mutex

func printLine(value any) {
	line, err := json.Marshal(value)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sds: encoding output:", err)
		os.Exit(1)
	}
	output.Lock()
	defer output.Unlock()
	if _, err := os.Stdout.Write(append(line, '\n')); err != nil {
		fmt.Fprintln(os.Stderr, "sds: writing output:", err)
		os.Exit(1)
	}
}

type endLine struct {
	End     bool   `json:"end"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

func printEnd(err error) {
	if errors.Is(err, io.EOF) {
		err = nil
	}
	st := status.Convert(err)
	printLine(endLine{End: true, Code: st.Code().String(), Message: st.Message()})
}

// ---------------------------------------------------------------------------------------------
// What a response held

type responseLine struct {
	VersionInfo     string       `json:"version_info"`
	Nonce           string       `json:"nonce"`
	TypeURL         string       `json:"type_url"`
	Valid           bool         `json:"valid"`
	ValidationError string       `json:"validation_error,omitempty"`
	Secrets         []secretLine `json:"secrets"`
}

type secretLine struct {
	Name               string            `json:"name"`
	Kind               string            `json:"kind"`
	CertificateChain   string            `json:"certificate_chain,omitempty"`
	PrivateKeyBytes    *int              `json:"private_key_bytes,omitempty"`
	TrustedCA          string            `json:"trusted_ca,omitempty"`
	Validator          string            `json:"validator,omitempty"`
	SPIFFETrustDomains map[string]string `json:"spiffe_trust_domains,omitempty"`
}

// describe unpacks and validates a response.
func describe(resp *discoveryv3.DiscoveryResponse) responseLine {
	line := responseLine{
		VersionInfo: resp.GetVersionInfo(),
		Nonce:       resp.GetNonce(),
		TypeURL:     resp.GetTypeUrl(),
		Secrets:     []secretLine{},
	}
	var problems []string
	check := func(what string, err error) {
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", what, err))
		}
	}
	check("DiscoveryResponse", resp.ValidateAll())
	for i, resource := range resp.GetResources() {
		secret := &tlsv3.Secret{}
		if err := resource.UnmarshalTo(secret); err != nil {
			check(fmt.Sprintf("resource %d (%s)", i, resource.GetTypeUrl()), err)
			continue
		}
		check(fmt.Sprintf("Secret %q", secret.GetName()), secret.ValidateAll())
		out := secretLine{Name: secret.GetName()}
		switch kind := secret.GetType().(type) {
		case *tlsv3.Secret_TlsCertificate:
			out.Kind = "tls_certificate"
			out.CertificateChain = dataSource(kind.TlsCertificate.GetCertificateChain())
			keyBytes := len(dataSource(kind.TlsCertificate.GetPrivateKey()))
			out.PrivateKeyBytes = &keyBytes
		case *tlsv3.Secret_ValidationContext:
			out.Kind = "validation_context"
			validation := kind.ValidationContext
			out.TrustedCA = dataSource(validation.GetTrustedCa())
			if custom := validation.GetCustomValidatorConfig(); custom != nil {
				out.Validator = custom.GetName()
				config := &tlsv3.SPIFFECertValidatorConfig{}
				if custom.GetTypedConfig().MessageIs(config) {
					if err := custom.GetTypedConfig().UnmarshalTo(config); err != nil {
						check(fmt.Sprintf("Secret %q: typed_config", secret.GetName()), err)
						break
					}
					check(fmt.Sprintf("Secret %q: SPIFFECertValidatorConfig", secret.GetName()), config.ValidateAll())
					out.SPIFFETrustDomains = map[string]string{}
					for _, td := range config.GetTrustDomains() {
						out.SPIFFETrustDomains[td.GetName()] = dataSource(td.GetTrustBundle())
					}
				} else if custom.GetName() == spiffeValidatorName {
					check(fmt.Sprintf("Secret %q", secret.GetName()),
						fmt.Errorf("%s with a typed_config of %s", spiffeValidatorName, custom.GetTypedConfig().GetTypeUrl()))
				}
			}
		case *tlsv3.Secret_SessionTicketKeys:
			out.Kind = "session_ticket_keys"
		case *tlsv3.Secret_GenericSecret:
			out.Kind = "generic_secret"
		default:
			out.Kind = "none"
		}
		line.Secrets = append(line.Secrets, out)
	}
	line.Valid = len(problems) == 0
	if !line.Valid {
		line.ValidationError = strings.Join(problems, "; ")
	}
	return line
}

// dataSource is an inline DataSource's contents; another kind is named, not read.
func dataSource(source *corev3.DataSource) string {
	switch specifier := source.GetSpecifier().(type) {
	case nil:
		return ""
	case *corev3.DataSource_InlineBytes:
		return string(specifier.InlineBytes)
	case *corev3.DataSource_InlineString:
		return specifier.InlineString
	case *corev3.DataSource_Filename:
		return "<filename " + specifier.Filename + ">"
	default:
		return fmt.Sprintf("<%T>", specifier)
	}
}

// ---------------------------------------------------------------------------------------------
// stream

// request is one stdin line of `sds stream`.
type request struct {
	Names *[]string `json:"names"`
	Ack   *bool     `json:"ack"`
	Error string    `json:"error"`
	Wait  string    `json:"wait"`
}

// streamState is what the sender needs from the receiver: the last response, and a count of
// responses for waits.
type streamState struct {
	mu       sync.Mutex
	changed  chan struct{} // closed and replaced on every response
	received int
	last     *discoveryv3.DiscoveryResponse
}

func (s *streamState) update(resp *discoveryv3.DiscoveryResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.last = resp
	s.received++
	close(s.changed)
	s.changed = make(chan struct{})
}

// waitFor waits until more than `seen` responses were received, or `timeout`; it returns
// the count then and whether a new response came. (When the stream ends the receiver exits
// the program.)
func (s *streamState) waitFor(seen int, timeout time.Duration) (int, bool) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		received, changed := s.received, s.changed
		s.mu.Unlock()
		if received > seen {
			return received, true
		}
		select {
		case <-changed:
		case <-deadline.C:
			return received, false
		}
	}
}

func stream(args []string) error {
	opts := parseOptions("stream", args, false)
	node, err := opts.node()
	if err != nil {
		return err
	}
	client, conn, err := opts.client()
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), streamLifetime)
	defer cancel()
	calls, err := client.StreamSecrets(ctx)
	if err != nil {
		printEnd(err)
		return nil
	}

	state := &streamState{changed: make(chan struct{})}
	// The receiver prints each response as it arrives, and at the end of the stream the end
	// line, and exits. It records a response before printing it: a request written after the
	// test has read the line must carry that response's nonce, or the server takes it for a
	// stale one and ignores it.
	go func() {
		for {
			resp, err := calls.Recv()
			if err != nil {
				printEnd(err)
				os.Exit(0)
			}
			state.update(resp)
			printLine(describe(resp))
		}
	}()

	var (
		names        []string
		ackedVersion string // version_info of the last response ACKed
		first        = true
		seen         int // responses counted by the last request or wait
	)
	input := bufio.NewScanner(os.Stdin)
	input.Buffer(make([]byte, 64*1024), 1024*1024)
	for input.Scan() {
		text := strings.TrimSpace(input.Text())
		if text == "" {
			continue
		}
		var req request
		decoder := json.NewDecoder(strings.NewReader(text))
		decoder.DisallowUnknownFields()
		if err := decoder.Decode(&req); err != nil {
			fail(fmt.Errorf("request line %q: %w", text, err))
		}
		ack := req.Ack == nil || *req.Ack
		if ack && req.Error != "" {
			fail(fmt.Errorf("request line %q: an error goes with \"ack\": false", text))
		}
		if req.Names != nil || req.Ack != nil || req.Error != "" || req.Wait == "" {
			if req.Names != nil {
				names = *req.Names
			}
			state.mu.Lock()
			last, received := state.last, state.received
			state.mu.Unlock()
			msg := &discoveryv3.DiscoveryRequest{
				TypeUrl:       secretTypeURL,
				ResourceNames: names,
				ResponseNonce: last.GetNonce(),
			}
			if first {
				msg.Node = node
				first = false
			}
			if ack {
				msg.VersionInfo = last.GetVersionInfo()
				ackedVersion = msg.VersionInfo
			} else {
				msg.VersionInfo = ackedVersion
				msg.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: req.Error}
			}
			seen = received
			// An error means the stream is over (io.EOF) or failing: the receiver prints how
			// it ended and exits.
			if err := calls.Send(msg); err != nil && !errors.Is(err, io.EOF) {
				fmt.Fprintln(os.Stderr, "sds: sending:", err)
			}
		}
		if req.Wait != "" {
			timeout, err := time.ParseDuration(req.Wait)
			if err != nil {
				fail(fmt.Errorf("request line %q: %w", text, err))
			}
			var came bool
			if seen, came = state.waitFor(seen, timeout); !came {
				printLine(map[string]bool{"timeout": true})
			}
		}
	}
	if err := input.Err(); err != nil {
		fail(fmt.Errorf("reading stdin: %w", err))
	}
	_ = calls.CloseSend()
	time.Sleep(endTimeout)
	fmt.Fprintln(os.Stderr, "sds: the server did not end the stream within", endTimeout, "of the end of input")
	os.Exit(0)
	return nil
}

// ---------------------------------------------------------------------------------------------
// fetch and delta

func fetch(args []string) error {
	opts := parseOptions("fetch", args, true)
	node, err := opts.node()
	if err != nil {
		return err
	}
	client, conn, err := opts.client()
	if err != nil {
		return err
	}
	defer conn.Close()
	names := []string{}
	if opts.names != "" {
		names = strings.Split(opts.names, ",")
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	resp, err := client.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{
		TypeUrl:       secretTypeURL,
		ResourceNames: names,
		Node:          node,
	})
	if err != nil {
		printEnd(err)
		return nil
	}
	printLine(describe(resp))
	return nil
}

func delta(args []string) error {
	opts := parseOptions("delta", args, false)
	node, err := opts.node()
	if err != nil {
		return err
	}
	client, conn, err := opts.client()
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	calls, err := client.DeltaSecrets(ctx)
	if err != nil {
		printEnd(err)
		return nil
	}
	if err := calls.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: secretTypeURL}); err != nil {
		fmt.Fprintln(os.Stderr, "sds: sending:", err)
	}
	for {
		resp, err := calls.Recv()
		if err != nil {
			printEnd(err)
			return nil
		}
		printLine(map[string]any{
			"delta_response": true,
			"nonce":          resp.GetNonce(),
			"type_url":       resp.GetTypeUrl(),
			"resources":      len(resp.GetResources()),
		})
	}
}
