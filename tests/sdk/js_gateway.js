// The official Genesys Cloud JavaScript SDK (purecloud-platform-client-v2), unchanged, pointed
// at the proxy through its documented setGateway. Prints one JSON object of what it saw; never
// a secret or token.
//
// usage: node js_gateway.js HOST PORT LOGIN_PREFIX CLIENT_ID CLIENT_SECRET TOKEN_LIFETIME_SECONDS
const platformClient = require('purecloud-platform-client-v2');

const [host, port, loginPrefix, clientId, secret, lifetime] = process.argv.slice(2);
const status = (e) => e.status || (e.response && e.response.status) || -1;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

(async () => {
  const seen = {};
  const client = platformClient.ApiClient.instance;
  client.setGateway({ host, protocol: 'http', port: Number(port), path_params_login: loginPrefix, path_params_api: '' });
  client.config.logger.log_level = client.config.logger.logLevelEnum.level.LNone;
  try {
    await client.loginClientCredentialsGrant(clientId, secret + '-wrong');
    seen.wrong_secret_status = 200;
  } catch (e) {
    seen.wrong_secret_status = status(e);
  }
  const auth = await client.loginClientCredentialsGrant(clientId, secret);
  seen.token_prefix = auth.accessToken.slice(0, 5);
  seen.expires_in_ms = auth.tokenExpiryTime - Date.now() > 0;
  const users = await new platformClient.UsersApi().getUsers({ pageSize: 2 });
  seen.users = (users.entities || []).length;
  const org = await new platformClient.OrganizationApi().getOrganizationsMe();
  seen.org_id_set = Boolean(org.id);
  try {
    await new platformClient.RoutingApi().getRoutingQueues();
    seen.routing_status = 200;
  } catch (e) {
    seen.routing_status = status(e);
    // Without returnExtended the SDK rejects with the error body itself.
    seen.routing_code = (e.body && e.body.code) || e.code;
  }
  await sleep((Number(lifetime) + 1) * 1000);
  try {
    await new platformClient.UsersApi().getUsers();
    seen.expired_status = 200;
  } catch (e) {
    seen.expired_status = status(e);
  }
  await client.loginClientCredentialsGrant(clientId, secret);
  seen.relogin_users = ((await new platformClient.UsersApi().getUsers({ pageSize: 2 })).entities || []).length;
  console.log(JSON.stringify(seen));
})().catch((e) => {
  console.error('sdk run failed:', status(e), e.message || e);
  process.exit(1);
});
