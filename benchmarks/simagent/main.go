// simagent: the simulated agents of benchmarks/controller_scale.py in Go (--generator go).
//
// The same fleet as the Python worker (SimAgent, Worker): one TLS connection and one
// AgentService.Connect stream per agent, the same status reports, events and command
// answers, the same JSON-lines control protocol on stdin/stdout. The Python worker
// prepares what each agent starts from (certificates, Register, NodeStatus, event log:
// controller_scale.export_agents) and execs this binary, so both generators send the same
// bytes; the Go types are generated from protos/nfctl/v1/nfctl.proto when the benchmark
// builds this program (package nfctlpb, not kept in the tree). What this changes is the
// load generator's own cost per message: the Python workers' event loops share the
// machine's two CPUs with the controller replicas and fall behind during a fan-out.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"

	pb "nfctl.local/simagent/nfctlpb"
)

const lagPeriod = 10 * time.Millisecond // as LAG_PERIOD in controller_scale.py

var eventReasons = []string{"DriftCorrected", "MapEntriesUpdated", "InterfaceMissing", "Applied"}

// rawCodec passes serialized protobuf through; messages are marshalled by the agent.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	p := v.(*[]byte)
	*p = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

type config struct {
	Index            int      `json:"index"`
	First            int      `json:"first"`
	Count            int      `json:"count"`
	Endpoints        []string `json:"endpoints"`
	Interval         float64  `json:"interval"`
	EventProbability float64  `json:"event_probability"`
	ApplyDelay       float64  `json:"apply_delay"`
	Pki              string   `json:"pki"`
}

// exported: one agent as controller_scale.export_agents writes it (base64 protobuf).
type exported struct {
	Index    int      `json:"index"`
	Name     string   `json:"name"`
	Register string   `json:"register"`
	Report   string   `json:"report"`
	History  []string `json:"history"`
	Sequence uint64   `json:"sequence"`
}

func unix(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

type stats struct {
	registered, connectErrors, streamErrors, reconnects          int64
	statuses, events, results, statusBytesSampled, statusSamples int64
	mu                                                           sync.Mutex
	errors                                                       []string
}

func (s *stats) error(text string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.errors) < 10 {
		s.errors = append(s.errors, text)
	}
}

type worker struct {
	cfg      config
	stats    stats
	agents   []*agent
	byIndex  map[int]*agent
	creds    map[string]credentials.TransportCredentials
	stopping atomic.Bool
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	mu       sync.Mutex
	received map[string][][2]float64 // revision -> [(seen at, replica index)]
	lags     [][2]float64            // (when, how late) the lag probe ran
}

type agent struct {
	w     *worker
	index int
	name  string

	mu         sync.Mutex // everything below, and the stream's sends
	endpoint   int        // which replica: the next one after a failed session
	rng        *rand.Rand
	register   *pb.AgentMessage
	report     *pb.AgentMessage
	status     *pb.NodeStatus // inside report, mutated in place
	history    []*pb.Event
	sequence   uint64
	stream     grpc.ClientStream
	connected  bool
	startedAt  float64
	registered float64
}

func write(stream grpc.ClientStream, m proto.Message) error {
	data, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	return stream.SendMsg(&data)
}

func receive(stream grpc.ClientStream) (*pb.ControllerMessage, error) {
	var data []byte
	if err := stream.RecvMsg(&data); err != nil {
		return nil, err
	}
	message := &pb.ControllerMessage{}
	return message, proto.Unmarshal(data, message)
}

// send writes one message on the current stream; the caller holds a.mu.
func (a *agent) send(m proto.Message) error {
	if a.stream == nil {
		return nil
	}
	return write(a.stream, m)
}

func (a *agent) newEvent(reason, message, nf string) *pb.Event {
	a.sequence++
	now := unix(time.Now())
	e := &pb.Event{
		Time: now, Type: "Normal", Reason: reason, Message: message, Node: a.name, Nf: nf,
		Revision: a.status.LastAppliedRevision, Author: "NetOps Bot <netops@example.net>",
		CommitTime: now - 300, Sequence: a.sequence,
	}
	a.history = append(a.history, e)
	if len(a.history) > 50 {
		a.history = a.history[len(a.history)-50:]
	}
	return e
}

func eventsMessage(events []*pb.Event) *pb.AgentMessage {
	return &pb.AgentMessage{Body: &pb.AgentMessage_Events{Events: &pb.EventReport{Events: events}}}
}

// sendStatus: as SimAgent.send_status (a live map's entry count moves); holds a.mu.
func (a *agent) sendStatus() error {
	a.status.ObservedAt = unix(time.Now())
	draw := a.rng.Float64()
	fn := a.status.Functions[int(draw*float64(len(a.status.Functions)))]
	live := fn.Maps[0]
	entries := live.Entries + int64(draw*60) - 20
	if entries < 0 {
		entries = 0
	}
	if entries > live.MaxEntries {
		entries = live.MaxEntries
	}
	live.Entries = entries
	if (atomic.AddInt64(&a.w.stats.statuses, 1)-1)%64 == 0 {
		atomic.AddInt64(&a.w.stats.statusBytesSampled, int64(proto.Size(a.report)))
		atomic.AddInt64(&a.w.stats.statusSamples, 1)
	}
	return a.send(a.report)
}

func (a *agent) dial() (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time: 20 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true,
		}),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}), grpc.MaxCallRecvMsgSize(16<<20)),
	}
	if a.w.cfg.Pki == "" {
		opts = append(opts, grpc.WithInsecure())
	} else {
		opts = append(opts, grpc.WithTransportCredentials(a.w.creds[a.name]))
	}
	return grpc.Dial(a.w.cfg.Endpoints[a.endpoint], opts...)
}

// run: sessions until stopped, the next replica after a failed one, with jittered backoff.
func (a *agent) run() {
	defer a.w.wg.Done()
	failures := 0
	a.mu.Lock()
	a.startedAt = unix(time.Now())
	a.mu.Unlock()
	for !a.w.stopping.Load() {
		conn, err := a.dial()
		if err == nil {
			err = a.session(conn)
			conn.Close()
		}
		a.mu.Lock()
		wasConnected := a.connected
		a.connected, a.stream = false, nil
		a.mu.Unlock()
		if a.w.stopping.Load() {
			return
		}
		if wasConnected {
			atomic.AddInt64(&a.w.stats.streamErrors, 1)
		} else {
			atomic.AddInt64(&a.w.stats.connectErrors, 1)
		}
		a.w.stats.error(fmt.Sprintf("%s: %v", a.name, err))
		failures++
		atomic.AddInt64(&a.w.stats.reconnects, 1)
		exp := failures
		if exp > 8 {
			exp = 8
		}
		delay := 0.5 * float64(int(1)<<exp)
		if delay > 30 {
			delay = 30
		}
		a.mu.Lock() // the last session's ticker may still hold the rng
		a.endpoint = (a.endpoint + 1) % len(a.w.cfg.Endpoints)
		delay *= 0.5 + 0.5*a.rng.Float64()
		a.mu.Unlock()
		select {
		case <-a.w.ctx.Done():
			return
		case <-time.After(time.Duration(delay * float64(time.Second))):
		}
	}
}

func (a *agent) session(conn *grpc.ClientConn) error {
	ctx, cancel := context.WithCancel(a.w.ctx)
	defer cancel()
	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true},
		"/nfctl.v1.AgentService/Connect")
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.register.GetRegister().LastEventSequence = a.sequence
	err = write(stream, a.register)
	a.mu.Unlock()
	if err != nil {
		return err
	}
	reply, err := receive(stream)
	if err != nil {
		return err
	}
	registered := reply.GetRegistered()
	if registered == nil {
		return fmt.Errorf("expected Registered, got %v", reply)
	}
	a.mu.Lock()
	a.stream, a.connected = stream, true
	if a.registered == 0 {
		a.registered = unix(time.Now())
		atomic.AddInt64(&a.w.stats.registered, 1)
	}
	// like the real agent: resend what the controller has not stored yet
	var resend []*pb.Event
	for _, e := range a.history {
		if e.Sequence > registered.AckedEventSequence {
			resend = append(resend, e)
		}
	}
	if len(resend) > 0 {
		err = a.send(eventsMessage(resend))
		atomic.AddInt64(&a.w.stats.events, int64(len(resend)))
	}
	if err == nil {
		err = a.sendStatus()
	}
	a.mu.Unlock()
	if err != nil {
		return err
	}
	go a.tick(ctx)
	for {
		message, err := receive(stream)
		if err != nil {
			return err
		}
		if command := message.GetCommand(); command != nil {
			if err := a.onCommand(command); err != nil {
				return err
			}
		}
	}
}

func (a *agent) tick(ctx context.Context) {
	cfg := a.w.cfg
	a.mu.Lock()
	wait := time.Duration(a.rng.Float64() * cfg.Interval * float64(time.Second))
	a.mu.Unlock()
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		a.mu.Lock()
		if a.sendStatus() == nil && a.rng.Float64() < cfg.EventProbability {
			nf := a.status.Functions[0].Name
			reason := eventReasons[a.rng.Intn(len(eventReasons))]
			e := a.newEvent(reason, fmt.Sprintf("%s: %s on eth0", reason, nf), nf)
			if a.send(eventsMessage([]*pb.Event{e})) == nil {
				atomic.AddInt64(&a.w.stats.events, 1)
			}
		}
		wait = time.Duration(cfg.Interval * (0.8 + 0.4*a.rng.Float64()) * float64(time.Second))
		a.mu.Unlock()
	}
}

func (a *agent) onCommand(command *pb.Command) error {
	now := unix(time.Now())
	if reconcile := command.GetReconcile(); reconcile != nil {
		revision := reconcile.Revision
		a.mu.Lock()
		endpoint := a.endpoint
		a.mu.Unlock()
		a.w.mu.Lock()
		a.w.received[revision] = append(a.w.received[revision], [2]float64{now, float64(endpoint)})
		a.w.mu.Unlock()
		if revision != "" && a.w.cfg.ApplyDelay > 0 {
			a.mu.Lock()
			delay := (0.2 + 0.8*a.rng.Float64()) * a.w.cfg.ApplyDelay
			a.mu.Unlock()
			time.AfterFunc(time.Duration(delay*float64(time.Second)), func() { a.apply(revision) })
		}
	}
	result := &pb.AgentMessage{Body: &pb.AgentMessage_Result{Result: &pb.CommandResult{
		CommandId: command.Id, Ok: true, Message: "reconcile scheduled",
	}}}
	a.mu.Lock()
	err := a.send(result)
	a.mu.Unlock()
	atomic.AddInt64(&a.w.stats.results, 1)
	return err
}

// apply: what the real agent reports after applying a pushed revision.
func (a *agent) apply(revision string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.stream == nil {
		return
	}
	a.status.LastAppliedRevision = revision
	a.status.LastAttemptedRevision = revision
	if a.status.Source != nil {
		a.status.Source.LastFetchedRevision = revision
	}
	for _, fn := range a.status.Functions {
		fn.Revision = revision
	}
	_ = a.sendStatus()
}

// probe: a status change the operator side must see, a new lastAppliedRevision; returns
// (sent at, index of the replica holding the stream).
func (a *agent) probe(revision string) [2]float64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.status.LastAppliedRevision = revision
	a.status.LastAttemptedRevision = revision
	sent := unix(time.Now())
	_ = a.sendStatus()
	return [2]float64{sent, float64(a.endpoint)}
}

// watchLoop: how late a timer due every lagPeriod runs, as Worker.watch_loop.
func (w *worker) watchLoop() {
	for !w.stopping.Load() {
		due := time.Now().Add(lagPeriod)
		time.Sleep(lagPeriod)
		now := time.Now()
		late := now.Sub(due).Seconds()
		if late < 0 {
			late = 0
		}
		w.mu.Lock()
		w.lags = append(w.lags, [2]float64{unix(now), late})
		if len(w.lags) > 20000 {
			w.lags = w.lags[len(w.lags)-20000:]
		}
		w.mu.Unlock()
	}
}

func cpuSeconds() float64 {
	data, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0
	}
	text := string(data)
	fields := strings.Fields(text[strings.LastIndexByte(text, ')')+2:])
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	return (utime + stime) / 100 // USER_HZ
}

func (a *agent) isConnected() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.connected
}

func (w *worker) handle(op string, request map[string]json.RawMessage) (interface{}, error) {
	switch op {
	case "connect":
		go w.watchLoop()
		for _, a := range w.agents {
			w.wg.Add(1)
			go a.run()
		}
		return map[string]int{"started": len(w.agents)}, nil
	case "registered":
		times := [][2]float64{}
		for _, a := range w.agents {
			a.mu.Lock()
			if a.registered != 0 {
				times = append(times, [2]float64{a.startedAt, a.registered})
			}
			a.mu.Unlock()
		}
		return map[string]interface{}{"count": atomic.LoadInt64(&w.stats.registered), "times": times}, nil
	case "probe":
		var pairs [][2]json.RawMessage
		if err := json.Unmarshal(request["agents"], &pairs); err != nil {
			return nil, err
		}
		sent := map[string][2]float64{}
		for _, pair := range pairs {
			var index int
			var revision string
			if err := json.Unmarshal(pair[0], &index); err != nil {
				return nil, err
			}
			if err := json.Unmarshal(pair[1], &revision); err != nil {
				return nil, err
			}
			if a := w.byIndex[index]; a != nil && a.isConnected() {
				sent[a.name] = a.probe(revision)
			}
		}
		return sent, nil
	case "fanout_count", "fanout_times":
		var revision string
		if err := json.Unmarshal(request["revision"], &revision); err != nil {
			return nil, err
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		seen := append([][2]float64{}, w.received[revision]...)
		if op == "fanout_count" {
			return len(seen), nil
		}
		return seen, nil
	case "settle":
		return map[string]interface{}{"frozen": 0, "s": 0}, nil // Python's gc.freeze; nothing to do
	case "loop_lag":
		var since, until float64
		_ = json.Unmarshal(request["since"], &since)
		_ = json.Unmarshal(request["until"], &until)
		w.mu.Lock()
		defer w.mu.Unlock()
		worst, samples := 0.0, 0
		for _, l := range w.lags {
			if l[0] >= since && l[0] <= until {
				samples++
				if l[1] > worst {
					worst = l[1]
				}
			}
		}
		return map[string]interface{}{"max_ms": float64(int(worst*1e4)) / 10, "samples": samples}, nil
	case "stats":
		perReplica := make([]int, len(w.cfg.Endpoints))
		connected := 0
		for _, a := range w.agents {
			a.mu.Lock()
			if a.connected {
				connected++
				perReplica[a.endpoint]++
			}
			a.mu.Unlock()
		}
		w.stats.mu.Lock()
		errors := append([]string{}, w.stats.errors...)
		w.stats.mu.Unlock()
		return map[string]interface{}{
			"registered":            atomic.LoadInt64(&w.stats.registered),
			"connect_errors":        atomic.LoadInt64(&w.stats.connectErrors),
			"stream_errors":         atomic.LoadInt64(&w.stats.streamErrors),
			"reconnects":            atomic.LoadInt64(&w.stats.reconnects),
			"statuses":              atomic.LoadInt64(&w.stats.statuses),
			"events":                atomic.LoadInt64(&w.stats.events),
			"results":               atomic.LoadInt64(&w.stats.results),
			"status_bytes_sampled":  atomic.LoadInt64(&w.stats.statusBytesSampled),
			"status_samples":        atomic.LoadInt64(&w.stats.statusSamples),
			"errors":                errors,
			"connected":             connected,
			"connected_per_replica": perReplica,
			"cpu_seconds":           cpuSeconds(),
		}, nil
	case "stop":
		w.stopping.Store(true)
		w.cancel()
		w.wg.Wait()
		return map[string]bool{"stopped": true}, nil
	}
	return nil, fmt.Errorf("unknown op %s", op)
}

func decode(text string, m proto.Message) error {
	data, err := base64.StdEncoding.DecodeString(text)
	if err != nil {
		return err
	}
	return proto.Unmarshal(data, m)
}

func load(cfgJSON, agentsPath string) (*worker, error) {
	w := &worker{received: map[string][][2]float64{}, byIndex: map[int]*agent{},
		creds: map[string]credentials.TransportCredentials{}}
	if err := json.Unmarshal([]byte(cfgJSON), &w.cfg); err != nil {
		return nil, err
	}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	var pool *x509.CertPool
	if w.cfg.Pki != "" {
		ca, err := os.ReadFile(filepath.Join(w.cfg.Pki, "ca.crt"))
		if err != nil {
			return nil, err
		}
		pool = x509.NewCertPool()
		pool.AppendCertsFromPEM(ca)
	}
	file, err := os.Open(agentsPath)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	lines := bufio.NewScanner(file)
	lines.Buffer(make([]byte, 1<<20), 1<<26)
	for lines.Scan() {
		var e exported
		if err := json.Unmarshal(lines.Bytes(), &e); err != nil {
			return nil, err
		}
		a := &agent{w: w, index: e.Index, name: e.Name, rng: rand.New(rand.NewSource(int64(e.Index))),
			sequence: e.Sequence, endpoint: e.Index % len(w.cfg.Endpoints),
			register: &pb.AgentMessage{}, report: &pb.AgentMessage{}}
		if err := decode(e.Register, a.register); err != nil {
			return nil, err
		}
		if err := decode(e.Report, a.report); err != nil {
			return nil, err
		}
		a.status = a.report.GetStatus().GetStatus()
		if a.register.GetRegister() == nil || a.status == nil || len(a.status.Functions) == 0 {
			return nil, fmt.Errorf("%s: agent %s has no register or status", agentsPath, e.Name)
		}
		for _, h := range e.History {
			event := &pb.Event{}
			if err := decode(h, event); err != nil {
				return nil, err
			}
			a.history = append(a.history, event)
		}
		if w.cfg.Pki != "" {
			cert, err := tls.LoadX509KeyPair(filepath.Join(w.cfg.Pki, a.name+".crt"),
				filepath.Join(w.cfg.Pki, a.name+".key"))
			if err != nil {
				return nil, err
			}
			w.creds[a.name] = credentials.NewTLS(&tls.Config{
				Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12,
			})
		}
		w.agents = append(w.agents, a)
		w.byIndex[a.index] = a
	}
	return w, lines.Err()
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: simagent CONFIG_JSON AGENTS_FILE")
		os.Exit(2)
	}
	w, err := load(os.Args[1], os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, "simagent:", err)
		os.Exit(1)
	}
	// SIMAGENT_CPUPROFILE=path: where this worker's own CPU time goes (go tool pprof)
	if path := os.Getenv("SIMAGENT_CPUPROFILE"); path != "" {
		f, err := os.Create(fmt.Sprintf("%s.%d", path, w.cfg.Index))
		if err == nil && pprof.StartCPUProfile(f) == nil {
			defer pprof.StopCPUProfile()
		}
	}
	var out sync.Mutex
	reply := func(payload map[string]interface{}) {
		data, _ := json.Marshal(payload)
		out.Lock()
		defer out.Unlock()
		os.Stdout.Write(append(data, '\n'))
	}
	reply(map[string]interface{}{"id": 0, "result": map[string]interface{}{"ready": true, "pid": os.Getpid()}})
	input := bufio.NewScanner(os.Stdin)
	input.Buffer(make([]byte, 1<<20), 1<<26)
	var pending sync.WaitGroup
	for input.Scan() {
		var request map[string]json.RawMessage
		if err := json.Unmarshal(input.Bytes(), &request); err != nil {
			fmt.Fprintln(os.Stderr, "simagent: bad request:", err)
			continue
		}
		var id int64
		var op string
		_ = json.Unmarshal(request["id"], &id)
		_ = json.Unmarshal(request["op"], &op)
		pending.Add(1)
		serve := func() {
			defer pending.Done()
			result, err := w.handle(op, request)
			if err != nil {
				reply(map[string]interface{}{"id": id, "error": err.Error()})
			} else {
				reply(map[string]interface{}{"id": id, "result": result})
			}
		}
		if op == "stop" {
			serve()
			break
		}
		go serve()
	}
	pending.Wait()
}
